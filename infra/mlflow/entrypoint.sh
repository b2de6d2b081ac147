#!/bin/sh
# Renders the basic-auth configuration from the environment, then runs the given command
# (the `mlflow server ...` line of compose.yaml or the Kubernetes manifest).
#
# Why a rendered file: `--app-name basic-auth` reads its settings from the INI file named by
# MLFLOW_AUTH_CONFIG_PATH, and its user store URI (with a database password) has no
# environment variable of its own. The admin user's name and password do
# (MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD), so they never touch the file.
set -eu
: "${BASIC_AUTH_DATABASE_URI:?set BASIC_AUTH_DATABASE_URI (the basic-auth user store)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (first start creates the admin)}"
MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-basic-auth.ini}"
export MLFLOW_AUTH_CONFIG_PATH
umask 077
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${BASIC_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}
database_uri = ${BASIC_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
INI
exec "$@"
