"""The bottom layer: helpers every stage may use; imports nothing of the project."""
