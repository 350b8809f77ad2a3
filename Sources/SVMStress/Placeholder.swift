// SVMStress: see the issue tracker.
