"""Observability: console/TensorBoard/MLflow loggers, throughput and MFU metrics, profiling."""
