# Grounded-SAM ML backend for Label Studio.
#   CPU:  docker build -t grounded-sam .
#   GPU:  docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t grounded-sam .
# Python packages from a mirror, a private CA or a wheelhouse (pip's own variables, used by the
# pip installs below and kept out of the image's environment; unset ones change nothing):
#   --build-arg PIP_INDEX_URL=https://pypi.example.com/simple  [--build-arg PIP_TRUSTED_HOST=...]
#   buildah bud -v /srv/wheels:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels ...   (a wheelhouse)
#   buildah bud -v /etc/ssl/certs/ca-certificates.crt:/etc/pip-ca.pem:ro --build-arg PIP_CERT=/etc/pip-ca.pem
# No registry for the base image: scripts/build-base-image.sh builds it locally (docs/docker.md).
FROM python:3.11-slim

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/data/hf PORT=9090 THREADS=8

WORKDIR /app
RUN if [ -n "$TORCH_INDEX" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install "$TORCH_SPEC"; fi
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY _wsgi.py model.py ./
COPY backend ./backend

RUN useradd --create-home --uid 1000 app && mkdir -p /data/hf /data/compile-cache && chown -R app /data
USER app
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health', timeout=2)"
# One worker process holds the models; threads share them behind the engine lock.
CMD ["sh", "-c", "exec gunicorn --bind 0.0.0.0:${PORT} --workers 1 --threads ${THREADS} --timeout 300 _wsgi:app"]
