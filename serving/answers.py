"""The service's answers as pydantic models: what the OpenAPI document (`/docs.json`, the Swagger UI at `/`) shows.

The endpoints build these models and serialise them with pydantic-core (serving/service.py `answer`), and
tests/test_service.py validates real answers against them.
"""
from pydantic import BaseModel, ConfigDict, Field


class Candidate(BaseModel):
    class_id: int = Field(ge=0, description="index into the model's class names")
    class_name: str
    probability: float = Field(ge=0, le=1)


class Prediction(Candidate):
    """The most likely class (the fields above) and the five most likely."""
    top5: list[Candidate] = Field(min_length=5, max_length=5)
    note: str | None = Field(None, description="only when the file held several frames: which one was classified")


class ClassifyAnswer(BaseModel):
    predictions: list[Prediction] = Field(description="one per uploaded file, in upload order")


class BatchAnswer(BaseModel):
    class_ids: list[int] = Field(description="the most likely class of each image, in order")
    probabilities: list[list[float]] | None = Field(
        None, description="N × number of classes softmax probabilities; only when `probabilities=true` was sent")


class Metadata(BaseModel):
    """What export recorded about the model (the BentoML model's metadata)."""
    model_config = ConfigDict(extra="allow")
    part: str
    arch: str
    resolution: int
    classes: list[str]
    input: str
    output: str
    artifacts: list[str]
    checkpoint_sha256: str
    test_acc: float | None = Field(None, description="present only when the checkpoint recorded a measured accuracy")
    val_acc: float | None = None


class InfoAnswer(BaseModel):
    """GET /info: the served model, how it is served, and its call statistics."""
    model_config = ConfigDict(extra="allow")
    model: str = Field(description="the model store tag, name:version")
    metadata: Metadata
    backend: str = Field(description="torch | onnx | tensorrt")
    device: str
    precision: str
    engine_max_batch: int | None = Field(None, description="the largest batch one engine call takes (TensorRT)")
    auto: dict | None = Field(None, description="with CIFAR100_BACKEND=auto: the img/s measured for each backend "
                                                "and why others were left out")
    batching: dict = Field(description="max_batch_size, max_latency_ms, max_images_per_request, max_body_bytes")
    stats: dict = Field(description="model_calls, images, largest_call, seconds since start (of all model workers)")
    front_workers: int
    workers: list[dict] | None = Field(None, description="each model worker (two-process layout): worker, pid, "
                                                         "device, ready, backend, stats")
