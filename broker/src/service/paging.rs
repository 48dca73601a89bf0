//! Every list the broker serves is paged by ID: a page holds at most `PageRequest::MAX_LIMIT`
//! items, and its last item's ID is the cursor of the next page (0: there is none). A list
//! that grows with the market's history never becomes one unbounded answer.

use suanli_proto::to_status;
use suanli_types::PageRequest;
use tonic::Status;

/// The page a list request asked for.
#[derive(Clone, Copy, Debug)]
pub struct Page {
    /// Items with IDs up to this one were on earlier pages.
    pub after: u64,
    limit: usize,
}

impl Page {
    pub fn from_wire(after: u64, size: u32) -> Result<Page, Status> {
        let limit = PageRequest::limit_of(size).map_err(|e| to_status(&e))?;
        Ok(Page { after, limit })
    }

    /// Most items on a page.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The page out of `items`, given in increasing ID order (those not after the cursor are
    /// skipped), and the next page's cursor.
    pub fn take<T>(&self, items: impl IntoIterator<Item = (u64, T)>) -> (Vec<T>, u64) {
        let mut out = Vec::with_capacity(self.limit.min(64));
        let mut last = 0;
        for (id, item) in items.into_iter().filter(|(id, _)| *id > self.after) {
            if out.len() == self.limit {
                return (out, last);
            }
            last = id;
            out.push(item);
        }
        (out, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u64) -> impl Iterator<Item = (u64, u64)> {
        (1..=n).map(|i| (i, i))
    }

    #[test]
    fn pages_cover_every_item_once_in_order() {
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let (items, next) = Page::from_wire(after, 7).expect("page").take(ids(50));
            assert!(items.len() <= 7);
            seen.extend(items);
            if next == 0 {
                break;
            }
            after = next;
        }
        assert_eq!(seen, (1..=50).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_last_page_says_it_is_the_last() {
        let (items, next) = Page::from_wire(0, 5).expect("page").take(ids(5));
        assert_eq!((items.len(), next), (5, 0));
    }

    #[test]
    fn a_page_larger_than_the_maximum_is_refused_not_shortened() {
        assert_eq!(Page::from_wire(0, PageRequest::MAX_LIMIT + 1).expect_err("too large").code(), tonic::Code::InvalidArgument);
        let (items, _) = Page::from_wire(0, 0).expect("default").take(ids(1000));
        assert_eq!(items.len(), PageRequest::DEFAULT_LIMIT as usize);
    }
}
