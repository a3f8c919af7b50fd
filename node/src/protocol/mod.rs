//! What clients see, with no state behind it: the JSON frames, the query parameters
//! of the client endpoints, and redirect URLs.

pub mod close;
pub mod epoch;
pub mod frames;
pub mod params;
pub mod peer;
pub mod redirect;
pub mod ticket;
pub mod ysync;
