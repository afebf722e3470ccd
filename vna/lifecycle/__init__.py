"""The lifecycle manager: rules, migration of aged studies to the compressed cold tier, purge, holds."""
