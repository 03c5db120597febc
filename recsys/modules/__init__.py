"""Feature-interaction modules (each maps the field representation to a hidden vector)."""
