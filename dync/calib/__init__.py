"""Calibration of a package for a budget: exit thresholds for a compute or latency budget (`calibrate`,
`budget`, `thresholds`), per-stage latency profiles that predict a run's time (`profile`), and the
accuracy/cost picture (`plot`)."""
