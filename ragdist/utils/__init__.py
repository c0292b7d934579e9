"""Small shared helpers: distributed setup, logging sinks, console output."""
