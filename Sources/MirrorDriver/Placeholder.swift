// MirrorDriver: see the issue tracker.
