"""Glue both daemons (clsd, mlsd) share: `settings` (YAML into frozen dataclasses, `--set`
overrides, `ConfigError`), `notify` (systemd's sd_notify) and `lifecycle` (READY, watchdog,
health, drain). It imports nothing of cls, mls or engine."""
