"""Command-line interface: thin commands over the layers above; one module per command group."""
