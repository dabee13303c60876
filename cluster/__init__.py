"""Team serving: the engine as a Ray Serve application (`dgemma cluster up`). Only this package imports Ray."""
