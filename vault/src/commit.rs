//! Group commit: the writes of concurrent requests of one process share one
//! transaction, one audit-head lock and one fsync.
//!
//! Every tokenize inserts its cards and audit events in one transaction, and
//! every read (detokenize, metadata) appends its audit event before it
//! answers; each of those transactions takes the audit chain's head lock and
//! ends in a durable commit (an fsync: `synchronous = FULL` on SQLite,
//! `synchronous_commit = on` on PostgreSQL). Under load they would queue
//! behind each other one fsync at a time. Here one writer task per vault
//! takes whatever writes are waiting when it is free (up to [`MAX_JOBS`]
//! requests or [`MAX_CARDS`] cards) and runs them as one `insert_cards`
//! call: every card and every event in one transaction, in arrival order.
//! Each caller is answered only after that transaction committed: an
//! acknowledged token or audit event is as durable as before. There is no
//! added wait: a lone request is committed at once; the group forms while
//! the previous commit is in flight.
//!
//! The group's transaction is written by the store's dedicated writer if it
//! has one (SQLite: a thread with its own connection, `sqlite_writer.rs`),
//! else through the store's pool (PostgreSQL).
//!
//! If a group fails as a whole (a refused audit event, stale keys, a token
//! drawn twice), each of its requests is run again on its own, so one bad
//! request never fails the others.

use std::sync::Arc;

use audit::AuditEvent;
use tokio::sync::{mpsc, oneshot};

use async_trait::async_trait;

use crate::store::{Inserted, NewCard, Store, StoreError, Writer};

/// Most requests in one group.
pub const MAX_JOBS: usize = 256;
/// Most cards in one group (a batch call alone may bring 1000).
pub const MAX_CARDS: usize = 2000;

enum Job {
    Cards {
        cards: Vec<NewCard>,
        events: Vec<AuditEvent>,
        reply: oneshot::Sender<Result<Vec<Inserted>, StoreError>>,
    },
    Event {
        event: AuditEvent,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Card uses for retention: written (for the whole group in one
    /// statement list and transaction) before the group's cards and events.
    Touch {
        tokens: Vec<String>,
        now: i64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Job {
    fn cards(&self) -> usize {
        match self {
            Job::Cards { cards, .. } => cards.len(),
            Job::Event { .. } | Job::Touch { .. } => 0,
        }
    }

    /// The key versions a card job was sealed under (a group holds one).
    fn versions(&self) -> Option<(u32, u32)> {
        match self {
            Job::Cards { cards, .. } => cards
                .first()
                .map(|c| (c.row.key_version, c.row.fingerprint_version)),
            Job::Event { .. } | Job::Touch { .. } => None,
        }
    }
}

/// The writer of one vault: cloned handles send to it.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    jobs: mpsc::UnboundedSender<Job>,
}

impl GroupCommit {
    /// Start the writer task on the current Tokio runtime; it ends when the
    /// last handle is dropped (the vault sealed or closed).
    pub fn start(store: Arc<dyn Store>) -> GroupCommit {
        let (jobs, rx) = mpsc::unbounded_channel();
        let sink: Arc<dyn Writer> = match store.dedicated_writer() {
            Ok(Some(w)) => w,
            Ok(None) => Arc::new(ThroughStore(store)),
            Err(e) => {
                tracing::warn!(error = %e, "no dedicated writer; group commits go through the pool");
                Arc::new(ThroughStore(store))
            }
        };
        tokio::spawn(writer(sink, rx));
        GroupCommit { jobs }
    }

    /// [`Store::insert_cards`] through the group.
    pub async fn insert_cards(
        &self,
        cards: Vec<NewCard>,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<Inserted>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Cards {
                cards,
                events,
                reply,
            })
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }

    /// [`Store::touch_cards`] through the group (day granularity).
    pub async fn touch_cards(&self, tokens: Vec<String>, now: i64) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Touch { tokens, now, reply })
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }

    /// [`Store::append_audit`] through the group.
    pub async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Event { event, reply })
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }
}

/// The store's own writes, through its pool.
#[derive(Debug)]
struct ThroughStore(Arc<dyn Store>);

#[async_trait]
impl Writer for ThroughStore {
    async fn insert_cards(
        &self,
        cards: Vec<NewCard>,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<Inserted>, StoreError> {
        self.0.insert_cards(cards, events).await
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.0.append_audit(event).await.map(|_| ())
    }

    async fn touch_cards(
        &self,
        tokens: &[String],
        now: i64,
        granularity_ms: i64,
    ) -> Result<(), StoreError> {
        self.0.touch_cards(tokens, now, granularity_ms).await
    }
}

async fn writer(store: Arc<dyn Writer>, mut rx: mpsc::UnboundedReceiver<Job>) {
    // A card job under other key versions than the group's waits for the
    // next group.
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut versions = first.versions();
        let mut cards = first.cards();
        let mut group = vec![first];
        while group.len() < MAX_JOBS && cards < MAX_CARDS {
            let Ok(job) = rx.try_recv() else { break };
            match (versions, job.versions()) {
                (Some(a), Some(b)) if a != b => {
                    held = Some(job);
                    break;
                }
                (None, Some(b)) => versions = Some(b),
                _ => {}
            }
            cards += job.cards();
            group.push(job);
        }
        commit(store.as_ref(), group).await;
    }
}

use crate::tenants::DAY_MS;

/// Run one group; answer every job.
async fn commit(store: &dyn Writer, group: Vec<Job>) {
    // Card uses first, all in one transaction.
    let (touches, group): (Vec<Job>, Vec<Job>) = group
        .into_iter()
        .partition(|j| matches!(j, Job::Touch { .. }));
    if !touches.is_empty() {
        let mut tokens = Vec::new();
        let mut now = 0;
        for job in &touches {
            if let Job::Touch {
                tokens: t, now: n, ..
            } = job
            {
                tokens.extend(t.iter().cloned());
                now = now.max(*n);
            }
        }
        let result = store.touch_cards(&tokens, now, DAY_MS).await;
        for job in touches {
            if let Job::Touch { reply, .. } = job {
                let _ = reply.send(result.as_ref().map(|_| ()).map_err(|_| {
                    StoreError::Unavailable(sqlx::Error::Protocol("touch failed".into()))
                }));
            }
        }
    }
    if group.is_empty() {
        return;
    }
    if group.len() == 1 {
        for job in group {
            alone(store, job).await;
        }
        return;
    }
    let mut cards = Vec::new();
    let mut events = Vec::new();
    for job in &group {
        match job {
            Job::Cards {
                cards: c,
                events: e,
                ..
            } => {
                cards.extend(c.iter().map(clone_card));
                events.extend(e.iter().cloned());
            }
            Job::Event { event, .. } => events.push(event.clone()),
            Job::Touch { .. } => {}
        }
    }
    match store.insert_cards(cards, events).await {
        Ok(inserted) => {
            let mut inserted = inserted.into_iter();
            for job in group {
                match job {
                    Job::Cards { cards, reply, .. } => {
                        let mine: Vec<Inserted> = inserted.by_ref().take(cards.len()).collect();
                        let _ = reply.send(Ok(mine));
                    }
                    Job::Event { reply, .. } | Job::Touch { reply, .. } => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        }
        // Nothing of the group was written: each request on its own.
        Err(_) => {
            for job in group {
                alone(store, job).await;
            }
        }
    }
}

async fn alone(store: &dyn Writer, job: Job) {
    match job {
        Job::Cards {
            cards,
            events,
            reply,
        } => {
            let _ = reply.send(store.insert_cards(cards, events).await);
        }
        Job::Event { event, reply } => {
            let _ = reply.send(store.append_audit(event).await);
        }
        Job::Touch { tokens, now, reply } => {
            let _ = reply.send(store.touch_cards(&tokens, now, DAY_MS).await);
        }
    }
}

fn clone_card(c: &NewCard) -> NewCard {
    NewCard {
        row: c.row.clone(),
        event: c.event.clone(),
        previous_fingerprints: c.previous_fingerprints.clone(),
    }
}
