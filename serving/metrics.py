"""The service's own Prometheus series, on GET /metrics beside BentoML's request metrics; labelled by model worker.

    cifar100_model_calls_total{worker}                 model calls
    cifar100_model_images_total{worker}                images through the model
    cifar100_model_call_duration_seconds{worker}       a histogram of model-call durations (its _sum: model seconds)
    cifar100_requests_per_model_call{worker}           a histogram of the requests each model call merged

`worker` is the model worker's number (from 1); in the one-process layout (CIFAR100_PROCESSES=1), that of the
front that holds the model. BentoML runs prometheus_client in multiprocess mode: each process writes its series
into files in a folder its server's processes share, and the front's /metrics adds them up, those of exited
processes included, so a counter keeps counting across a worker's restart. prometheus_client is imported at the
first series, not with this module: BentoML points it at that folder only after importing the service module.
"""
import functools

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REQUESTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@functools.cache
def families():
    import prometheus_client as prom
    return (prom.Counter("cifar100_model_calls", "Model calls", ["worker"]),
            prom.Counter("cifar100_model_images", "Images through the model", ["worker"]),
            prom.Histogram("cifar100_model_call_duration_seconds", "Duration of a model call", ["worker"],
                           buckets=DURATION_BUCKETS),
            prom.Histogram("cifar100_requests_per_model_call", "Requests merged into one model call", ["worker"],
                           buckets=REQUESTS_BUCKETS))


class ModelMetrics:
    """The series of one model worker, there (at 0) from its start."""

    def __init__(self, worker):
        self.calls, self.images, self.duration, self.requests = (f.labels(worker=str(worker)) for f in families())

    def model_call(self, images, seconds):
        self.calls.inc()
        self.images.inc(images)
        self.duration.observe(seconds)
