"""Observability adapters: OpenTelemetry traces (tracing), structured logs (logs), traced
billing calls (billing). app.py wires them; nothing else imports OpenTelemetry."""
