//! Size limits on what a service sends: a body over `MAX_MESSAGE_SIZE` is refused before it
//! reaches the broker (RabbitMQ would close the channel on it).

use crate::transport::TransportError;

/// Refuse a body of `len` bytes over `max` (the `MAX_MESSAGE_SIZE`); `what` names it.
///
/// ```
/// use micro_framework::transport::limits::check_size;
/// assert!(check_size("event", 10, 16).is_ok());
/// let error = check_size("event", 17, 16).unwrap_err();
/// assert_eq!(
///     error.to_string(),
///     "limit reached: event of 17 bytes exceeds MAX_MESSAGE_SIZE (16 bytes); not sent"
/// );
/// ```
pub fn check_size(what: &str, len: usize, max: usize) -> Result<(), TransportError> {
    if len > max {
        return Err(TransportError::LimitReached(format!(
            "{what} of {len} bytes exceeds MAX_MESSAGE_SIZE ({max} bytes); not sent"
        )));
    }
    Ok(())
}
