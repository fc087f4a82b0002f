"""tq_mooncake.telemetry: OpenTelemetry instrumentation of the client (see issue 3)."""
