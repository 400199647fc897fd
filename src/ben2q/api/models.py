"""Request and answer bodies of the API that are not the queue's own models.

Job records are answered as ``ben2q.jobs.JobStatus``, the very model the workers write:
the API adds no second shape of a job.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..jobs import JobStatus, OutputFormat, WebhookEvent


class JobOptionsIn(BaseModel):
    """Options shared by ``POST /v1/jobs`` and ``POST /v1/remove``."""

    model_config = ConfigDict(extra="forbid")

    refine: bool = False
    """Estimate foreground colours (blur fusion) instead of keeping the input's."""
    format: OutputFormat = "png"
    """``png`` or lossless ``webp``."""
    mask: bool = False
    """Also write the alpha as an 8-bit grayscale PNG."""


class JobCreate(JobOptionsIn):
    """``POST /v1/jobs`` as JSON: ``input`` (one image) or ``inputs`` (a batch job)."""

    input: str | None = Field(None, max_length=4096, description="One image's URI.")
    inputs: list[str] | None = Field(
        None, min_length=1, description="A batch job's input URIs (at most the key's max)."
    )
    output: str | None = Field(
        None,
        max_length=1024,
        description="A sub-path of the key's output prefix, or a URI under it; default: "
        "the prefix itself.",
    )
    webhook_url: str | None = Field(None, max_length=2048)
    webhook_events: list[WebhookEvent] = Field(["final"], min_length=1, max_length=2)


class RemoveJson(JobOptionsIn):
    """``POST /v1/remove`` as JSON: one image by URI."""

    input: str = Field(max_length=4096)


class JobPage(BaseModel):
    """A page of ``GET /v1/jobs``: newest first; ``next_cursor`` fetches the next page."""

    jobs: list[JobStatus]
    next_cursor: str | None = None


class JobUpload(BaseModel):
    """``POST /v1/jobs`` as ``multipart/form-data``: one or more ``file`` parts (each an
    image), with the options as form fields. Documents the form; parsed by ``uploads``."""

    file: list[bytes] = Field(description="The images (binary parts named 'file').")
    output: str | None = None
    refine: bool = False
    format: OutputFormat = "png"
    mask: bool = False
    webhook_url: str | None = None
    webhook_events: list[WebhookEvent] = ["final"]
