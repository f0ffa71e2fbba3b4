//! vhost-vdpa transport (being built: issue 4).
