"""Create the pipeline's Kafka topics with explicit partition counts (brokers never auto-create).

python -m tools.topics [--partitions 6] [--replication 3]
"""

from __future__ import annotations

import argparse
import asyncio

from dicomsafe.common.config import env_str
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--partitions", type=int, default=6, help="partitions of the main topics (max replicas per group)"
    )
    parser.add_argument("--replication", type=int, default=1, help="replication factor (3 in production)")
    args = parser.parse_args()
    topics = Topics.from_env()
    specs = topic_specs(topics, args.partitions)
    asyncio.run(ensure_topics(env_str("KAFKA_BOOTSTRAP"), specs, args.replication))
    print("topics ready: " + ", ".join(f"{s.name}({s.partitions})" for s in specs))


if __name__ == "__main__":
    main()
