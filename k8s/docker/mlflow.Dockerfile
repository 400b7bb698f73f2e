# MLflow tracking server (cluster.k8s.mlflow_image): PostgreSQL backend store, S3 artifacts.
#   docker build -f k8s/docker/mlflow.Dockerfile -t <registry>/aov-mlflow:3.17.2 k8s/docker
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 boto3==1.43.117 "psycopg2-binary>=2.9,<3"
EXPOSE 5000
