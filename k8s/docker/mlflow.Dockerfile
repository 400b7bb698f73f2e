# MLflow tracking server (cluster.k8s.mlflow_image): PostgreSQL backend store, S3 artifacts.
# psycopg 3: SQLAlchemy 2.1 opens postgresql:// URIs with it (psycopg2 would fail at start);
# tests/test_mlflow_production.py runs this topology.
#   docker build -f k8s/docker/mlflow.Dockerfile -t <registry>/aov-mlflow:3.17.2 k8s/docker
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 boto3==1.43.117 "psycopg[binary]==3.3.9"
EXPOSE 5000
