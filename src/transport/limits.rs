//! Size limits on what a service sends: a body over `MAX_MESSAGE_SIZE` is refused before it
//! reaches the broker (RabbitMQ would close the channel on it).

use crate::transport::{Limit, TransportError};

/// Refuse a body of `len` bytes over `max` (the `MAX_MESSAGE_SIZE`) with
/// [`TransportError::LimitReached`] of [`Limit::MessageSize`]; `what` names the body.
///
/// ```
/// use micro_framework::transport::limits::check_size;
/// use micro_framework::transport::{Limit, TransportError};
/// assert!(check_size("event", 10, 16).is_ok());
/// let error = check_size("event", 17, 16).unwrap_err();
/// assert!(matches!(
///     error,
///     TransportError::LimitReached { what: Limit::MessageSize, size: 17, limit: 16, .. }
/// ));
/// assert!(error.is_permanent());
/// assert_eq!(
///     error.to_string(),
///     "limit reached: event of 17 bytes exceeds MAX_MESSAGE_SIZE (16 bytes); not sent"
/// );
/// ```
pub fn check_size(what: &str, len: usize, max: usize) -> Result<(), TransportError> {
    if len > max {
        return Err(TransportError::LimitReached {
            what: Limit::MessageSize,
            size: len as u64,
            limit: max as u64,
            reason: format!(
                "{what} of {len} bytes exceeds MAX_MESSAGE_SIZE ({max} bytes); not sent"
            ),
        });
    }
    Ok(())
}
