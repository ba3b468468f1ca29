"""Rank program: the run's WeightPublisher with `weight_sync: distributed` on 2 ranks at EP=2
(two senders) and 2 embedded servers that rank 0 runs (a ServerManager, as in a run). Version 1
goes to both. Before version 2 goes out, just after rank 0 found both servers alive, the second
server is SIGKILLed: the broadcast fails, the first server waits on it, so rank 0 restarts it
and the senders form their groups again with it alone and send version 2 again. Then rank 0
writes what the first server serves (served-0.json), the members and the publisher's log
(publisher.json), and every rank the same weights to OUT_DIR/reference (HF format).

argv: OUT_DIR HF_DIR PORT PORT"""

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner_train import stepped_learner
from weight_sync_cases import record_served

from dppo_megatron.learner.weights import save_hf
from dppo_megatron.rollout.servers import ServerManager, ServerSpec
from dppo_megatron.run.publisher import WeightPublisher


def main(out_dir, hf_dir, *ports) -> None:
    learner, arch = stepped_learner(hf_dir, "1", "2")
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    specs = [ServerSpec(hf_dir, int(port), engine="embedded", routed_experts=True) for port in ports]
    servers = ServerManager(specs, Path(out_dir) / "logs") if dist.get_rank() == 0 else None
    if servers is not None:
        servers.start()
    dist.barrier()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("dppo_megatron.run.publisher").addHandler(handler)
    urls = [spec.url for spec in specs]
    publisher = WeightPublisher(learner, arch, urls, method="distributed", weights_dir=Path(out_dir) / "w",
                                hf_config=config, side_files_from=Path(hf_dir), server_tp=1, servers=servers)
    publisher.publish(1)

    checked = publisher._membership_change

    def then_the_second_server_dies(force: bool):
        change = checked(force)
        if not force:  # the check before version 2: both alive, the groups stand
            os.kill(servers.processes[urls[1]].pid, signal.SIGKILL)
            time.sleep(0.5)  # gone, its sockets closed
        return change

    publisher._membership_change = then_the_second_server_dies
    publisher.publish(2)
    publisher.close()
    save_hf(learner.module, arch, Path(out_dir) / "reference", config=config, dtype=torch.float32)
    if servers is not None:
        record_served(out_dir, urls[:1])
        Path(out_dir, "publisher.json").write_text(json.dumps({"members": publisher.members, "urls": urls,
                                                               "log": records}))
        servers.stop()
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
