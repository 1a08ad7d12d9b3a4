"""Uploaded datasets: which unfinished jobs read one, and deleting one (row and file)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core.models import Dataset, Job
from core.states import JobState
from trainer.paths import uploaded_dataset_path

# A job in these states will still read its dataset (cancelling: it may be about to checkpoint).
READING_STATES = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.CANCELLING)


class DatasetInUse(Exception):
    """An unfinished job trains on the dataset: it may not be deleted yet."""

    def __init__(self, dataset_id: str, jobs: list[tuple[str, str]]) -> None:
        listed = ", ".join(f"{job_id} ({state})" for job_id, state in jobs[:5])
        more = f" and {len(jobs) - 5} more" if len(jobs) > 5 else ""
        super().__init__(
            f"dataset {dataset_id} is in use by {listed}{more}; cancel or wait for those jobs, then delete it"
        )
        self.jobs = jobs


def jobs_reading(session: Session, dataset_id: str) -> list[tuple[str, str]]:
    """(id, state) of the unfinished jobs whose spec names this upload, as training or validation data."""
    query = select(Job.id, Job.state).where(
        Job.state.in_([s.value for s in READING_STATES]),
        or_(
            Job.spec[("dataset", "id")].as_string() == dataset_id,
            Job.spec[("validation", "id")].as_string() == dataset_id,
        ),
    )
    return [(job_id, state) for job_id, state in session.execute(query.order_by(Job.created_at))]


def delete_dataset(session: Session, *, row: Dataset, data_root: Path) -> None:
    """Delete an upload's row and file and commit; DatasetInUse while an unfinished job names it.

    The caller holds the row locked (FOR UPDATE), and a submission that names the upload holds it
    shared until its job is committed, so a job cannot slip in between the check and the delete.
    The file goes before the commit: a failed commit leaves a row whose delete can be retried,
    never a file that no row accounts for.
    """
    in_use = jobs_reading(session, row.id)
    if in_use:
        session.rollback()
        raise DatasetInUse(row.id, in_use)
    session.delete(row)
    session.flush()
    with contextlib.suppress(FileNotFoundError):
        uploaded_dataset_path(data_root, row.id).unlink()
    session.commit()
