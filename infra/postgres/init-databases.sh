#!/bin/sh
# Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d).
# One database per consumer: MLflow's tracking store, MLflow's basic-auth user store, and
# Prefect's server database. They share the owner role of POSTGRES_USER.
set -eu
for db in mlflow mlflow_auth prefect; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE $db OWNER \"$POSTGRES_USER\";"
done
