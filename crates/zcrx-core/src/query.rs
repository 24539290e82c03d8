//! What the kernel's zcrx query (`IORING_REGISTER_QUERY` / `IO_URING_QUERY_ZCRX`, Linux
//! 6.19) says it can do, decoded once for everyone who asks: the runtime before it
//! registers, and `tokio-zcrx`'s capability probe for its report.

use zcrx_sys::ctrl::{ZCRX_CTRL_ADD_AREA, ZCRX_CTRL_ARM_EVENT, ZCRX_CTRL_FLUSH_RQ};
use zcrx_sys::query::io_uring_query_zcrx;
use zcrx_sys::zcrx::{
    IORING_ZCRX_AREA_DMABUF, ZCRX_FEATURE_EVENT, ZCRX_FEATURE_RX_PAGE_SIZE, ZCRX_REG_IMPORT,
    ZCRX_REG_NODEV,
};

/// The zcrx features a query answer reports, one flag each.
///
/// A kernel without the query (before 6.19) has none of them: every one is newer than the
/// query itself, so [`QueryFeatures::default`] (all absent) describes it.
///
/// ```
/// use zcrx_core::query::QueryFeatures;
/// use zcrx_sys::query::io_uring_query_zcrx;
///
/// // What Linux 7.1 answers: import and NODEV, FLUSH_RQ and EXPORT, rx_buf_len, no events.
/// let answer = io_uring_query_zcrx {
///     register_flags: 0b11,
///     nr_ctrl_opcodes: 2,
///     features: 0b01,
///     ..Default::default()
/// };
/// let features = QueryFeatures::decode(&answer);
/// assert!(features.register_nodev && features.ctrl_flush_rq && features.rx_page_size);
/// assert!(!features.events());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueryFeatures {
    /// `ZCRX_REG_IMPORT`: an instance can be exported and imported into another ring (6.19).
    pub register_import: bool,
    /// `ZCRX_REG_NODEV`: registration without a device (7.1).
    pub register_nodev: bool,
    /// `IORING_ZCRX_AREA_DMABUF`: areas backed by a dma-buf.
    pub area_dmabuf: bool,
    /// `ZCRX_CTRL_FLUSH_RQ` exists (`IORING_REGISTER_ZCRX_CTRL`, 6.19).
    pub ctrl_flush_rq: bool,
    /// `ZCRX_CTRL_ARM_EVENT` exists (7.2).
    pub ctrl_arm_event: bool,
    /// `ZCRX_CTRL_ADD_AREA` exists: areas can be added to a registered instance (7.3).
    pub ctrl_add_area: bool,
    /// `ZCRX_FEATURE_RX_PAGE_SIZE`: chunks larger than a page, `rx_buf_len` (7.0).
    pub rx_page_size: bool,
    /// `ZCRX_FEATURE_EVENT`: events and shared-memory statistics (7.2).
    pub event: bool,
}

impl QueryFeatures {
    /// Decodes the kernel's answer; bits this crate does not know are ignored (the raw
    /// answer keeps them for whoever wants to show them).
    pub fn decode(answer: &io_uring_query_zcrx) -> Self {
        Self {
            register_import: answer.register_flags & u64::from(ZCRX_REG_IMPORT) != 0,
            register_nodev: answer.register_flags & u64::from(ZCRX_REG_NODEV) != 0,
            area_dmabuf: answer.area_flags & u64::from(IORING_ZCRX_AREA_DMABUF) != 0,
            ctrl_flush_rq: answer.nr_ctrl_opcodes > ZCRX_CTRL_FLUSH_RQ,
            ctrl_arm_event: answer.nr_ctrl_opcodes > ZCRX_CTRL_ARM_EVENT,
            ctrl_add_area: answer.nr_ctrl_opcodes > ZCRX_CTRL_ADD_AREA,
            rx_page_size: answer.features & ZCRX_FEATURE_RX_PAGE_SIZE != 0,
            event: answer.features & ZCRX_FEATURE_EVENT != 0,
        }
    }

    /// Whether events can be used: the feature bit alone is not enough, the control
    /// operation that arms them must exist too.
    pub fn events(&self) -> bool {
        self.event && self.ctrl_arm_event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(register_flags: u32, nr_ctrl_opcodes: u32, features: u32) -> io_uring_query_zcrx {
        io_uring_query_zcrx {
            register_flags: register_flags.into(),
            area_flags: IORING_ZCRX_AREA_DMABUF.into(),
            nr_ctrl_opcodes,
            features,
            ..Default::default()
        }
    }

    #[test]
    fn linux_7_2_has_everything_but_add_area() {
        let features = QueryFeatures::decode(&answer(
            ZCRX_REG_IMPORT | ZCRX_REG_NODEV,
            3,
            ZCRX_FEATURE_RX_PAGE_SIZE | ZCRX_FEATURE_EVENT,
        ));
        assert_eq!(
            features,
            QueryFeatures {
                register_import: true,
                register_nodev: true,
                area_dmabuf: true,
                ctrl_flush_rq: true,
                ctrl_arm_event: true,
                ctrl_add_area: false,
                rx_page_size: true,
                event: true,
            }
        );
        assert!(features.events());
        // 7.3 answers 4 control operations: ADD_AREA is the fourth.
        let features = QueryFeatures::decode(&answer(ZCRX_REG_NODEV, 4, ZCRX_FEATURE_EVENT));
        assert!(features.ctrl_add_area && features.ctrl_arm_event);
    }

    #[test]
    fn the_event_bit_without_arm_event_is_not_usable() {
        let features = QueryFeatures::decode(&answer(0, 2, ZCRX_FEATURE_EVENT));
        assert!(features.event && !features.ctrl_arm_event);
        assert!(!features.events());
    }

    #[test]
    fn no_control_operations_and_unknown_bits() {
        let features = QueryFeatures::decode(&answer(ZCRX_REG_IMPORT | 0x10, 0, 0x80));
        assert!(features.register_import && !features.register_nodev);
        assert!(!features.ctrl_flush_rq && !features.ctrl_arm_event);
        assert!(!features.rx_page_size && !features.event);
        assert_eq!(
            QueryFeatures::default(),
            QueryFeatures::decode(&Default::default())
        );
    }
}
