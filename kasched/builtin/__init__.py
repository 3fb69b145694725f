"""Built-in behaviour, registered on the plugin bus like any third-party plugin."""
