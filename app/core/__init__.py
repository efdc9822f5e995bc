"""What every part shares: settings, domain errors, events and the SSE wire format, logging."""
