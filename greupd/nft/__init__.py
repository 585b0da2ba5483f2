"""nftables: the one table greupd owns (MSS clamp, NAT, forward accepts).

- `render`: Config -> Ruleset, pure, and the ruleset in nft syntax (`describe_ruleset`).
- `table`: `NftTable`, the ruleset applied as one libnftables transaction, compared, located on error.
- `watch`: `NftWatch`, nftables netlink events -> "look again".
"""

from greupd.nft.render import FROM_TUNNEL_MARK, Chain, Rule, Ruleset, Statement, describe_ruleset, render_ruleset
from greupd.nft.table import NftError, NftTable, normalize_listing
from greupd.nft.watch import NftWatch, NftWatchError

__all__ = [
    "FROM_TUNNEL_MARK",
    "Chain",
    "NftError",
    "NftTable",
    "NftWatch",
    "NftWatchError",
    "Rule",
    "Ruleset",
    "Statement",
    "describe_ruleset",
    "normalize_listing",
    "render_ruleset",
]
