"""The layer every stage shares: crash-safe file writes, dtype names, the loss ignore index, the CLI conventions.

It sits below model/ and depends on nothing of this project, so any package may import it.
"""
