"""Distribution: which peers to try, re-attach, relays, and the rank's presence in the mesh."""
