# Image of the Ray head and GPU workers (cluster.k8s.image). Not built in CI (no Docker there):
# check it on your registry before the first real run.
#   docker build -f k8s/docker/aov.Dockerfile -t <registry>/aov-dist:<tag> .
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /app
# Editable install: the apps find conf/ beside the package (/app/conf), whatever the job's cwd.
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users aov_dist aov_dist
COPY --chown=ray:users conf conf
# Linux torch wheels on PyPI are CUDA builds; constraints keep every version as tested.
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 \
 && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation -c constraints.txt deepspeed==0.19.8 \
 && pip install --no-cache-dir -c constraints.txt -e ".[gpu]"
ENV DS_ACCELERATOR=cuda RAY_USAGE_STATS_ENABLED=0
