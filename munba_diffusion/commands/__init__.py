"""The command lines (the top of the import graph): each parses its configuration and runs the library."""
