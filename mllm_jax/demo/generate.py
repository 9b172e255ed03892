"""The demo's generate stage: prior -> random-forest filter -> task shards, per corpus.

Each corpus (an index range of the prior) is filtered into `<out>/data/<name>/`:
`tasks-p00000-00000.array_record, ...` (one `encode_task` record per accepted task, in index
order) and `report.json` (the filter report with the prior settings). The directory is
assembled under a temporary name and renamed into place when complete, so an interrupted
run never leaves a corpus that looks finished.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mllm_jax.config import to_dict
from mllm_jax.data.shards import ShardWriter
from mllm_jax.data.tasks import Task
from mllm_jax.demo.config import CorpusConfig, GenerateConfig
from mllm_jax.eval.results_io import write_json
from mllm_jax.foundation.files import default_mode

REPORT_FILE = "report.json"


def corpus_dir(out: Path, name: str) -> Path:
    return out / "data" / name


def generate_corpus(
    out: Path, corpus: CorpusConfig, config: GenerateConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Draws, filters and writes one corpus into `<out>/data/<corpus.name>`.

    Returns the filter report (tasks seen, accepted, rejected by reason, consensus rows,
    throughput), also written to the corpus directory as `report.json`.
    """
    from mllm_jax.filtering.run import filter_into
    from mllm_jax.prior import iter_task_batches

    final = corpus_dir(out, corpus.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{corpus.name}.tmp-", dir=final.parent))
    default_mode(staging, directory=True)
    try:
        writer = ShardWriter(staging, config.tasks_per_shard)
        batches = iter_task_batches(
            config.seed, corpus.start, corpus.count, config.prior, config.batch_size
        )
        try:
            report = filter_into(
                batches,
                writer.add,
                dataclasses.replace(config.filter, consensus=corpus.consensus),
                workers=config.workers,
                total=corpus.count,
                report_path=staging / REPORT_FILE,
                progress=progress,
                settings={
                    "corpus": to_dict(corpus),
                    "seed": config.seed,
                    "prior": to_dict(config.prior),
                },
            )
        finally:
            writer.close()
        if writer.count == 0:
            raise RuntimeError(
                f"corpus {corpus.name!r}: the filter accepted none of {corpus.count} tasks "
                f"(rejected by reason: {report.get('rejected_by_reason')}); draw more tasks"
            )
        report["shards"] = [p.name for p in writer.paths]
        write_json(staging / REPORT_FILE, report)
        if final.exists():  # an earlier complete corpus the caller chose to redo
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def remove_partial_corpora(out: Path) -> list[Path]:
    """Deletes staging directories an interrupted run left under `<out>/data`."""
    data = out / "data"
    removed = sorted(data.glob(".*.tmp-*")) if data.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load_corpus_tasks(out: Path, name: str, limit: int | None = None) -> list[Task]:
    """The first `limit` tasks (all when None) of a written corpus, in index order."""
    from array_record.python.array_record_module import ArrayRecordReader

    from mllm_jax.data.tasks import decode_task

    directory = corpus_dir(out, name)
    shards = sorted(directory.glob("*.array_record"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no task shards (run the generate stage first)")
    tasks: list[Task] = []
    for shard in shards:
        reader = ArrayRecordReader(str(shard))
        try:
            for record in reader.read_all():
                tasks.append(decode_task(record))
                if limit is not None and len(tasks) >= limit:
                    return tasks
        finally:
            reader.close()
    return tasks
