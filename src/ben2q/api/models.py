"""Request and answer bodies of the API that are not the queue's own models.

Job records are answered as ``ben2q.jobs.JobStatus``, the very model the workers write:
the API adds no second shape of a job.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..jobs import Channels, ItemStatus, JobOptions, JobStatus, OutputFormat, WebhookEvent


class JobCreate(JobOptions):
    """``POST /v1/jobs`` as JSON: ``input`` (one image) or ``inputs`` (a batch job), and
    the job's options (the queue's own ``JobOptions``, validated by the same rules)."""

    input: str | None = Field(None, max_length=4096, description="One image's URI.")
    inputs: list[str] | None = Field(
        None, min_length=1, description="A batch job's input URIs (at most the key's max)."
    )
    prefix: str | None = Field(
        None,
        max_length=1024,
        description="A batch job's input location instead of `inputs` (`s3://bucket/photos/`"
        ", within the key's input scopes): the images under it become the job's items.",
    )
    output: str | None = Field(
        None,
        max_length=1024,
        description="A sub-path of the key's output prefix, or a URI under it; default: "
        "the prefix itself.",
    )
    webhook_url: str | None = Field(None, max_length=2048)
    webhook_events: list[WebhookEvent] = Field(["final"], min_length=1, max_length=2)

    def options(self) -> dict[str, object]:
        """The job options the request set (the rest keep their defaults)."""
        return self.model_dump(include=set(JobOptions.model_fields), exclude_unset=True)


class RemoveJson(JobOptions):
    """``POST /v1/remove`` as JSON: one image by URI, and the output options."""

    input: str = Field(max_length=4096)


class RemoveQuery(BaseModel):
    """Options of ``POST /v1/remove`` given in the query string (any body). Same names and
    meanings as ``JobOptions``; combinations are checked once merged with the body's."""

    format: OutputFormat | Literal["jpg"] | None = None
    quality: int | None = Field(None, ge=1, le=100)
    background: str | None = Field(None, max_length=4096)
    channels: Channels | None = None
    crop: bool | None = None
    crop_margin: str | None = Field(None, max_length=20, description="20, 20px or 5%")
    max_side: int | None = Field(None, ge=1, le=16384)
    scale: float | None = Field(None, gt=0.0, le=4.0)
    mask_threshold: int | None = Field(None, ge=1, le=255)
    mask_smooth: bool | None = None
    refine: bool | None = None
    mask: bool | None = Field(None, description="Answer the grayscale matte instead of the output")

    def given(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class JobPage(BaseModel):
    """A page of ``GET /v1/jobs``: newest first; ``next_cursor`` fetches the next page."""

    jobs: list[JobStatus]
    next_cursor: str | None = None


class ItemPage(BaseModel):
    """A page of ``GET /v1/jobs/{id}/items``: items in index order; ``next_cursor`` fetches
    the next page (None after the last)."""

    items: list[ItemStatus]
    total: int
    """The job's items in all."""
    next_cursor: str | None = None


class JobUpload(JobOptions):
    """``POST /v1/jobs`` as ``multipart/form-data``: one or more ``file`` parts (each an
    image), with the options as form fields. Documents the form; parsed by ``uploads``."""

    file: list[bytes] = Field(description="The images (binary parts named 'file').")
    output: str | None = None
    webhook_url: str | None = None
    webhook_events: list[WebhookEvent] = ["final"]
