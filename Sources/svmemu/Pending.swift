import ArgumentParser

// Commands whose implementation lands with their issues. Each file replaces its
// stand-in here when it arrives.
