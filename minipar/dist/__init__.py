"""Communication: communicators and their accounting, the rank mesh, ring algorithms."""
