"""Development tools, not part of the production image: the Deep-Image simulator, the webhook inbox,
the GCS emulator launcher, the dev stack."""
