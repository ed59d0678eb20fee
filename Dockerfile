# rnnserve: the API with the shipped models, CPU-only torch, one uvicorn worker per container.
# Build: docker build -t rnnserve .      Run: docker run -p 8000:8000 rnnserve
# Scale with more containers (docker-compose.yml runs two replicas behind nginx), not workers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RNNSERVE_MODELS_DIR=/srv/rnnserve/models

WORKDIR /srv/rnnserve

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
# torch comes from PyTorch's CPU index (PyPI's Linux wheel pulls in the CUDA stack, several GB);
# its pin is read from pyproject.toml, and the CPU build (2.13.0+cpu) satisfies that pin, so the
# second install takes only the remaining dependencies from PyPI.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "$(grep '^torch==' /tmp/requirements.txt)" \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The shipped checkpoints change less often than the code: their layer comes first.
COPY models/ models/
COPY app/ app/
# The package itself, without dependencies (they are above): gives the `rnnserve` command.
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build rnnserve.egg-info \
    && useradd --system --no-log-init --create-home --uid 10001 rnnserve \
    && chown rnnserve models  # training jobs (rnnserve worker) add models there

USER 10001
EXPOSE 8000

# Python's own urllib: the slim image has no curl. A non-200 answer or no answer raises: exit 1.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Settings come from RNNSERVE_* variables (see .env.example). One worker: one engine per model
# batches every request of the process, and sessions live in Redis, so replicas share them.
CMD ["rnnserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
