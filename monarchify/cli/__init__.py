"""The ``monarchify`` command line: thin Typer commands over the library."""
