//! Boots the bundled test guest under `trenv`.
