"""Message brokers: who assigns a message its id and hands it to the rooms.

Owns ordering. A room subscribes while it is alive on this node; ``publish``
gives a draft its id and the broker delivers the accepted message to every
subscriber of that room, in id order, exactly once.

Who owns what:

- :mod:`.base`: the :class:`Broker` and :class:`Subscriber` protocols and
  :class:`BrokerUnavailable`;
- :mod:`.local`: :class:`LocalBroker`, the embedded single-node broker;
- :mod:`.redis_link`, :mod:`.redis_subscription`, :mod:`.redis_broker`: the
  three layers of :class:`RedisBroker`, several nodes over Redis (or a Redis
  Cluster): the connection and the Lua scripts (``publish.lua``,
  ``presence.lua``, ``relay.lua``, package data); reading the subscription and
  reconnecting; publishing, presence, history and the log.
"""

from .base import Broker, BrokerUnavailable, Subscriber
from .local import LocalBroker
from .redis_broker import RedisBroker

__all__ = ["Broker", "BrokerUnavailable", "LocalBroker", "RedisBroker", "Subscriber"]
