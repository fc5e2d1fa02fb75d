"""Fine-tuning's driver side at a thousand jobs: what it does per poll and per summary does not
grow with the jobs already finished (the real progress board actor on the session's Ray)."""

from __future__ import annotations

import logging


def test_a_progress_poll_reads_only_what_changed_and_finished_jobs_log_once(ray_session, caplog):
    import ray

    from raybias.finetune.runner import ProgressMonitor, progress_board_class

    board = progress_board_class().remote()
    try:
        for i in range(1000):  # a thousand jobs of one step, all finished
            board.update.remote("clustered_dreambooth", f"g0-c{i}", 1, 1, 0.5, "done")
        board.update.remote("clustered_dreambooth", "g1-c0", 0, 4, None, "training")
        monitor = ProgressMonitor(board, total_steps=1004, interval_s=3600, line_every_s=0.0)
        with caplog.at_level(logging.INFO, logger="raybias"):
            monitor.poll()
            first = [r.getMessage() for r in caplog.records]
            assert len(first) == 1001 and sum("(done)" in m for m in first) == 1000
            assert monitor.bar.n == 1000 and list(monitor.training) == ["clustered_dreambooth/g1-c0"]
            version = monitor.version
            ray.get(board.update.remote("clustered_dreambooth", "g1-c0", 2, 4, 0.25, "training"))
            now, changed = ray.get(board.snapshot.remote(version))
            assert now == version + 1 and list(changed) == ["clustered_dreambooth/g1-c0"]  # one entry, not 1001
            caplog.clear()
            monitor.poll()
            again = [r.getMessage() for r in caplog.records]
            # the training job's line (every line_every_s); the thousand finished jobs say nothing again
            assert again == ["[clustered_dreambooth g1-c0] step 2/4 loss 0.2500 (training)"]
            assert monitor.bar.n == 1002
        monitor.bar.close()
    finally:
        ray.kill(board)


def test_the_summary_of_a_thousand_models_is_a_few_lines(capsys):
    from raybias.finetune.runner import MAX_SUMMARY_LINES, print_summary

    models = [{"name": f"g{i % 4}-c{i // 4}", "weight": 0.004, "prompt_template": "a sks red {member}",
               "borrowed_from": None, "negative_prompt": None, "n_images": 1, "steps": 1,
               "final_loss": 1.0 + i / 1e4} for i in range(1000)]
    records = {m["name"]: {"wall_seconds": 2.0} for m in models}
    print_summary("clustered_dreambooth", {"models": models}, records)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == MAX_SUMMARY_LINES + 2
    assert lines[0].endswith("1000 model(s)") and "g0-c0" in lines[1]
    assert f"{MAX_SUMMARY_LINES} of 1000 models shown" in lines[-1] and "1.0000-1.0999" in lines[-1]
    small = models[:3]
    print_summary("clustered_dreambooth", {"models": small}, records)
    assert len(capsys.readouterr().out.splitlines()) == 4  # every model of a small stage
