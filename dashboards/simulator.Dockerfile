# The editwatch image of dashboards/compose.yaml (the simulator, the probe job and the MLflow
# server all run from it). Build context: the repository root.
FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY editors editors
COPY memory memory
COPY monitor monitor
COPY simulator simulator
# torch from its CPU index first: the PyPI wheel pulls a multi-GB CUDA build. The +cpu build
# satisfies the exact pin in pyproject.toml.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir .

ENV EDITWATCH_CACHE=/data/cache OMP_NUM_THREADS=1
WORKDIR /data
ENTRYPOINT ["simulate"]
