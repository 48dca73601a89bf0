//! How a project's images become tasks: the images in order, `task_size` to a task, each task
//! with `overlap` slots (each slot one annotator's pass over the whole task, so each image is
//! annotated by `overlap` different people), and honeypots (images whose labels are known)
//! mixed into every task at places an annotator cannot predict.

/// What a project asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanRequest {
    /// Images of the project, by index `0..images`.
    pub images: usize,
    pub task_size: usize,
    pub overlap: usize,
    /// Indexes of the images with known labels (not given out as ordinary work).
    pub honeypots: Vec<usize>,
    /// Honeypots added to each task.
    pub honeypots_per_task: usize,
}

pub const MAX_TASK_SIZE: usize = 1_000;
pub const MAX_OVERLAP: usize = 10;
/// Honeypots in one task: a few keep annotators honest; more only slow the work.
pub const MAX_HONEYPOTS_PER_TASK: usize = 10;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a task holds 1 to {MAX_TASK_SIZE} images")]
    TaskSize,
    #[error("each image is annotated by 1 to {MAX_OVERLAP} annotators")]
    Overlap,
    #[error("the project has no images to annotate (honeypots aside)")]
    NoImages,
    #[error("honeypot {0} is not an image of the project")]
    UnknownHoneypot(usize),
    #[error("{per_task} honeypots per task, but only {known} images have known labels")]
    TooFewHoneypots { per_task: usize, known: usize },
    #[error("at most {MAX_HONEYPOTS_PER_TASK} honeypots a task, and no more than its other images")]
    TooManyHoneypots,
}

/// The tasks, each the image indexes it holds in the order they are shown.
pub fn plan_tasks(request: &PlanRequest) -> Result<Vec<Vec<usize>>, PlanError> {
    if !(1..=MAX_TASK_SIZE).contains(&request.task_size) {
        return Err(PlanError::TaskSize);
    }
    if !(1..=MAX_OVERLAP).contains(&request.overlap) {
        return Err(PlanError::Overlap);
    }
    let mut gold = request.honeypots.clone();
    gold.sort_unstable();
    gold.dedup();
    if let Some(&bad) = gold.iter().find(|&&i| i >= request.images) {
        return Err(PlanError::UnknownHoneypot(bad));
    }
    if request.honeypots_per_task > MAX_HONEYPOTS_PER_TASK.min(request.task_size) {
        return Err(PlanError::TooManyHoneypots);
    }
    if request.honeypots_per_task > gold.len() {
        return Err(PlanError::TooFewHoneypots { per_task: request.honeypots_per_task, known: gold.len() });
    }
    let work: Vec<usize> = (0..request.images).filter(|i| gold.binary_search(i).is_err()).collect();
    if work.is_empty() {
        return Err(PlanError::NoImages);
    }
    let mut tasks = Vec::with_capacity(work.len().div_ceil(request.task_size));
    for (task_no, chunk) in work.chunks(request.task_size).enumerate() {
        let mut images = chunk.to_vec();
        for h in 0..request.honeypots_per_task {
            // Honeypots in turn, so every one is seen; each at a position drawn from the task's
            // number, so no place in a task gives it away.
            let honeypot = gold[(task_no * request.honeypots_per_task + h) % gold.len()];
            let at = mix(task_no as u64 * 31 + h as u64) as usize % (images.len() + 1);
            images.insert(at, honeypot);
        }
        tasks.push(images);
    }
    Ok(tasks)
}

/// A fixed mixing function (splitmix64's finalizer): positions must not repeat from task to
/// task, and a plan must come out the same every time it is made.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(images: usize, task_size: usize) -> PlanRequest {
        PlanRequest { images, task_size, overlap: 3, honeypots: Vec::new(), honeypots_per_task: 0 }
    }

    #[test]
    fn images_are_split_in_order_with_a_short_last_task() {
        assert_eq!(plan_tasks(&request(7, 3)), Ok(vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]));
    }

    #[test]
    fn honeypots_are_left_out_of_the_work_and_mixed_into_every_task() {
        let tasks = plan_tasks(&PlanRequest { honeypots: vec![9, 4], honeypots_per_task: 1, ..request(10, 4) }).expect("a plan");
        let work: Vec<usize> = tasks.iter().flatten().copied().filter(|i| *i != 4 && *i != 9).collect();
        assert_eq!(work, vec![0, 1, 2, 3, 5, 6, 7, 8]);
        assert_eq!(tasks.len(), 2);
        for task in &tasks {
            assert_eq!(task.iter().filter(|i| **i == 4 || **i == 9).count(), 1, "{task:?}");
        }
        // Both honeypots are used.
        assert!(tasks.iter().flatten().any(|i| *i == 4) && tasks.iter().flatten().any(|i| *i == 9));
        assert_eq!(plan_tasks(&PlanRequest { honeypots: vec![9, 4], honeypots_per_task: 1, ..request(10, 4) }).expect("again"), tasks);
    }

    #[test]
    fn impossible_plans_say_why() {
        assert_eq!(plan_tasks(&request(5, 0)), Err(PlanError::TaskSize));
        assert_eq!(plan_tasks(&PlanRequest { overlap: 0, ..request(5, 2) }), Err(PlanError::Overlap));
        assert_eq!(plan_tasks(&PlanRequest { overlap: 11, ..request(5, 2) }), Err(PlanError::Overlap));
        assert_eq!(plan_tasks(&PlanRequest { honeypots: vec![5], ..request(5, 2) }), Err(PlanError::UnknownHoneypot(5)));
        assert_eq!(
            plan_tasks(&PlanRequest { honeypots: vec![0], honeypots_per_task: 2, ..request(5, 2) }),
            Err(PlanError::TooFewHoneypots { per_task: 2, known: 1 })
        );
        assert_eq!(plan_tasks(&PlanRequest { honeypots: vec![0], ..request(1, 2) }), Err(PlanError::NoImages));
        assert_eq!(plan_tasks(&PlanRequest { honeypots: (0..20).collect(), honeypots_per_task: 3, ..request(40, 2) }), Err(PlanError::TooManyHoneypots));
        assert_eq!(plan_tasks(&PlanRequest { honeypots: (0..20).collect(), honeypots_per_task: 11, ..request(40, 100) }), Err(PlanError::TooManyHoneypots));
    }
}
