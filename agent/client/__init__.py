"""The mlsidecar client SDK: log a model's predictions and outcomes to the agent.

    from agent.client import SidecarClient
    client = SidecarClient("127.0.0.1:4320", model="fraud", model_version="v1")
    client.log_prediction(request_id, {"amount": 42.0, "merchant": "fuel"}, score=0.12)

Depends only on grpcio, protobuf, numpy and pybreaker (plus, when installed,
opentelemetry-api for trace linking and the drop metric, and pandas for DataFrames);
it imports no server module of ``agent``. See docs/client.md.
"""

from agent.client._async import AsyncSidecarClient
from agent.client._core import TimedPrediction
from agent.client._delivery import ClientStats
from agent.client._sync import SidecarClient
from agent.client.credentials import CredentialsError, channel_credentials, read_token

__all__ = [
    "AsyncSidecarClient",
    "ClientStats",
    "CredentialsError",
    "SidecarClient",
    "TimedPrediction",
    "channel_credentials",
    "read_token",
]
