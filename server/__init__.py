"""The Lepton FL aggregation daemon: config, gRPC servicers, round engine, store, checkpoints."""
