"""The reclaimer service: takes over entries idle too long, handles them, exports group metrics."""
