"""Federated sites: other sites over gRPC (:class:`SiteClient`, :class:`Sites`) and cross-site copies.

A site is one Cassandra datacenter, its front-ends and its hot tier. The index
is shared; store ids are site-qualified (``hot-1@A``, see
:func:`vna.domain.site_of`), so every placement names the site that holds it
and each site's jobs touch only their own placements.
"""

from vna.federation.sites import SiteClient, Sites

__all__ = ["SiteClient", "Sites"]
