"""Ray Train jobs: spec (request types), worker (the loop on every rank), checkpoints, driver
(run_training), config (the command line's config), data_config (the config follows the data),
local (one process, no Ray)."""
